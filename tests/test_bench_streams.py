"""`livelens bench streams`'s arithmetic on the services' metrics: counters and histogram
percentiles between two scrapes (the way Prometheus' histogram_quantile reads buckets)."""

import math

from devtools.bench.streams import delta, histogram_quantile

NAME = "livelens_llm_frame_to_kv_seconds"


def scrape(buckets: dict[float, float], count_metric: float = 0.0) -> dict:
    """A scrape holding a histogram's cumulative buckets and one counter."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        (f"{NAME}_bucket", (("le", "+Inf" if math.isinf(le) else str(le)),)): v for le, v in buckets.items()}
    out[("livelens_llm_kv_frames_ingested_total", ())] = count_metric
    return out


def test_percentiles_are_interpolated_within_the_bucket_of_the_observations_between_scrapes():
    before = scrape({0.5: 10, 1.0: 10, 2.0: 10, math.inf: 10}, count_metric=5)
    # 100 new observations: 50 under 0.5 s, 40 in (0.5, 1], 10 in (1, 2]
    after = scrape({0.5: 60, 1.0: 100, 2.0: 110, math.inf: 110}, count_metric=25)
    assert histogram_quantile(before, after, NAME, 0.5) == 0.5
    assert math.isclose(histogram_quantile(before, after, NAME, 0.7), 0.5 + 0.5 * 20 / 40)
    assert math.isclose(histogram_quantile(before, after, NAME, 0.99), 1.0 + 1.0 * 9 / 10)
    assert delta(before, after, "livelens_llm_kv_frames_ingested_total") == 20


def test_beyond_the_last_bound_only_the_bound_is_known_and_no_observation_is_nan():
    before = scrape({1.0: 0, 60.0: 0, math.inf: 0})
    after = scrape({1.0: 5, 60.0: 8, math.inf: 10})
    assert histogram_quantile(before, after, NAME, 0.99) == 60.0
    assert math.isnan(histogram_quantile(before, before, NAME, 0.5))


def test_a_replica_that_leaves_keeps_its_last_counters_so_no_delta_goes_negative():
    import http.server
    import threading

    from devtools.bench import streams

    count = {"n": 3.0}

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = f"# TYPE livelens_llm_coalesced_total counter\nlivelens_llm_coalesced_total {count['n']}\n"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    before = streams.scrape([url])
    count["n"] = 10.0
    streams.scrape([url])  # as it leaves
    server.shutdown()
    server.server_close()
    after = streams.scrape([url])  # it is gone
    assert delta(before, after, "livelens_llm_coalesced_total") == 7.0
