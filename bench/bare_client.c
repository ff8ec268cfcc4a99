/*
 * bare_client.c: the throughput baseline. A plain libcurl multi client with
 * no host, no Lua, no event library: N POSTs, C in flight, easy handles
 * reused, the same request the resil-lua side sends, byte for byte (its
 * default headers included: the user agent, and Accept-Encoding: gzip).
 *
 *   bare_client URL N CONCURRENCY [CA_FILE]  -> prints "requests seconds rps errors"
 *
 * With CA_FILE (an https URL), the TLS and HTTP/2 settings resil-lua uses:
 * h2 by ALPN, multiplexing, transfers waiting for a connection to share
 * (PIPEWAIT), at most 100 streams per connection, TLS sessions shared.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <curl/curl.h>

#ifndef USER_AGENT
#define USER_AGENT "resil-lua"
#endif

static const char body[] = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

static size_t discard(char *p, size_t s, size_t n, void *u) { (void)p, (void)u; return s * n; }

static const char *ca_file;
static CURLSH *share;

static void setup(CURL *e, const char *url, struct curl_slist *headers) {
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "gzip");
  if (ca_file) {
    curl_easy_setopt(e, CURLOPT_CAINFO, ca_file);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt(e, CURLOPT_SHARE, share);
  }
}

int main(int argc, char **argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: bare_client URL N CONCURRENCY [CA_FILE]\n");
    return 2;
  }
  const char *url = argv[1];
  long n = atol(argv[2]), c = atol(argv[3]), started = 0, done = 0, errors = 0;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  CURLM *m = curl_multi_init();
  if (argc == 5) {
    ca_file = argv[4];
    share = curl_share_init();
    curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    curl_multi_setopt(m, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    curl_multi_setopt(m, CURLMOPT_MAX_CONCURRENT_STREAMS, 100L);
  }
  struct curl_slist *headers = curl_slist_append(NULL, "content-type: application/json");
  headers = curl_slist_append(headers, "Expect:");
  headers = curl_slist_append(headers, "User-Agent: " USER_AGENT);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (; started < c && started < n; started++) {
    CURL *e = curl_easy_init();
    setup(e, url, headers);
    curl_multi_add_handle(m, e);
  }
  while (done < n) {
    int running;
    curl_multi_perform(m, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(m, &left))) {
      if (msg->msg != CURLMSG_DONE) continue;
      CURL *e = msg->easy_handle;
      long status = 0;
      curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
      if (msg->data.result != CURLE_OK || status != 200) errors++;
      done++;
      curl_multi_remove_handle(m, e);
      if (started < n) {
        started++;
        curl_multi_add_handle(m, e); /* reuse the handle and its connection */
      } else {
        curl_easy_cleanup(e);
      }
    }
    if (done < n) curl_multi_poll(m, NULL, 0, 1000, NULL);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("%ld %.3f %.0f %ld\n", n, secs, (double)n / secs, errors);
  curl_slist_free_all(headers);
  curl_multi_cleanup(m);
  if (share) curl_share_cleanup(share);
  curl_global_cleanup();
  return errors ? 1 : 0;
}
