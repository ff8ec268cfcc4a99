import socket, sys, threading, json
port=int(sys.argv[1]); n=int(sys.argv[2]); size=int(sys.argv[3])
body=json.dumps({"model":"fast","messages":[{"role":"user","content":"x"*size}]}).encode()
res={}
def one(i):
    s=socket.create_connection(("127.0.0.1",port)); s.settimeout(15)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"%len(body)+body)
    out=b""
    try:
        while True:
            d=s.recv(65536)
            if not d: break
            out+=d
    except Exception as e: out+=b"<"+str(e).encode()+b">"
    k=out[:12] if out.startswith(b"HTTP") else out[-30:]
    res[k]=res.get(k,0)+1
ts=[threading.Thread(target=one,args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(res)
