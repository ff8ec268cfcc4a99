/*
 * bare_socket_client.c: a second throughput baseline. The same requests as
 * bare_client.c, but driven the way resil-lua drives libcurl: the multi
 * *socket* API on a libevent loop (the design that scales to 10,000 in
 * flight). No Lua, no host: what is left of the gap to bare_client.c is the
 * price of that API, not of resil-lua.
 *
 *   bare_socket_client URL N CONCURRENCY  -> prints "requests seconds rps errors"
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <curl/curl.h>

#ifndef USER_AGENT
#define USER_AGENT "resil-lua"
#endif
#include <event2/event.h>

static const char body[] = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

static CURLM *multi;
static struct event_base *base;
static struct event *timer;
static long n, started, done, errors;

static size_t discard(char *p, size_t s, size_t k, void *u) { (void)p, (void)u; return s * k; }

static void check_done(void) {
  CURLMsg *msg;
  int left;
  while ((msg = curl_multi_info_read(multi, &left))) {
    if (msg->msg != CURLMSG_DONE) continue;
    CURL *e = msg->easy_handle;
    long status = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    if (msg->data.result != CURLE_OK || status != 200) errors++;
    done++;
    curl_multi_remove_handle(multi, e);
    if (started < n) {
      started++;
      curl_multi_add_handle(multi, e);
    } else {
      curl_easy_cleanup(e);
    }
  }
  if (done >= n) event_base_loopbreak(base);
}

static void on_socket(evutil_socket_t fd, short what, void *arg) {
  int running, flags = (what & EV_READ ? CURL_CSELECT_IN : 0) | (what & EV_WRITE ? CURL_CSELECT_OUT : 0);
  curl_multi_socket_action(multi, fd, flags, &running);
  check_done();
}

static void on_timer(evutil_socket_t fd, short what, void *arg) {
  int running;
  curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done();
}

static int socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
  struct event *ev = socketp;
  if (what == CURL_POLL_REMOVE) {
    if (ev) event_free(ev);
    curl_multi_assign(multi, s, NULL);
    return 0;
  }
  short kind = EV_PERSIST | (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
  if (ev) {
    event_del(ev);
    event_assign(ev, base, s, kind, on_socket, NULL);
  } else {
    ev = event_new(base, s, kind, on_socket, NULL);
    curl_multi_assign(multi, s, ev);
  }
  event_add(ev, NULL);
  return 0;
}

static int timer_cb(CURLM *m, long ms, void *userp) {
  if (ms < 0) {
    evtimer_del(timer);
  } else {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(timer, &tv);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: bare_socket_client URL N CONCURRENCY\n");
    return 2;
  }
  const char *url = argv[1];
  n = atol(argv[2]);
  long c = atol(argv[3]);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  struct event_config *cfg = event_config_new();
  event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST); /* as resil-lua */
  base = event_base_new_with_config(cfg);
  event_config_free(cfg);
  timer = evtimer_new(base, on_timer, NULL);
  multi = curl_multi_init();
  curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb);
  struct curl_slist *headers = curl_slist_append(NULL, "content-type: application/json");
  headers = curl_slist_append(headers, "Expect:");
  headers = curl_slist_append(headers, "User-Agent: " USER_AGENT);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (; started < c && started < n; started++) {
    CURL *e = curl_easy_init();
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "gzip");
    curl_multi_add_handle(multi, e);
  }
  event_base_dispatch(base);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("%ld %.3f %.0f %ld\n", n, secs, (double)n / secs, errors);
  curl_slist_free_all(headers);
  curl_multi_cleanup(multi);
  event_free(timer);
  event_base_free(base);
  curl_global_cleanup();
  return errors ? 1 : 0;
}
