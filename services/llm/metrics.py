"""The LLM service's histograms (its counters are its stats, `services.common.metrics`)."""

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

FRAME_TO_CONTEXT = Histogram(
    "livelens_llm_frame_to_context_seconds",
    "A frame accepted by the gateway -> its tokens in the stream's context", buckets=LATENCY_BUCKETS)
# Finer than LATENCY_BUCKETS where a live context's lag lies (llm.backpressure.max_context_lag_s): `bench
# streams` reads its percentiles from these buckets.
LAG_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
FRAME_TO_KV = Histogram(
    "livelens_llm_frame_to_kv_seconds",
    "A frame accepted by the gateway -> its KV prefilled (streaming KV): how far the context lags the stream",
    buckets=LAG_BUCKETS)
FRAME_ARRIVAL = Histogram(
    "livelens_llm_frame_arrival_seconds",
    "A frame accepted by the gateway -> its tokens reach the LLM service (the encoder and Kafka's part of the lag)",
    buckets=LAG_BUCKETS)
FRAMES_COALESCED = Counter(
    "livelens_llm_frames_coalesced", "Frames folded into a later one because their stream's prefill was behind "
    "(llm.backpressure.max_context_lag_s), per tenant", ["tenant"])
TIME_TO_FIRST_TOKEN = Histogram(
    "livelens_llm_time_to_first_token_seconds", "Engine submit -> the answer's first token", buckets=LATENCY_BUCKETS)
E2E_ANSWER = Histogram(
    "livelens_llm_e2e_request_latency_seconds", "A question accepted by the gateway -> its last token",
    buckets=LATENCY_BUCKETS)
REBUILD = Histogram(
    "livelens_llm_context_rebuild_seconds", "A stream's context rebuilt from its checkpoint and a replay",
    buckets=LATENCY_BUCKETS)
TENANT_FRAMES = Counter("livelens_llm_tenant_frames", "Frames added to contexts, per tenant", ["tenant"])
TENANT_QUESTIONS = Counter("livelens_llm_tenant_questions", "Questions taken, per tenant", ["tenant"])
ANSWER_ERRORS = Counter("livelens_llm_answer_errors", "Answers that ended with an error, by status", ["code"])
