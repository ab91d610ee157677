"""The LLM service's histograms (its counters are its stats, `livelens.metrics`)."""

from prometheus_client import Counter, Histogram

from livelens.metrics import LATENCY_BUCKETS

FRAME_TO_CONTEXT = Histogram(
    "livelens_llm_frame_to_context_seconds",
    "A frame accepted by the gateway -> its tokens in the stream's context", buckets=LATENCY_BUCKETS)
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
