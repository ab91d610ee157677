"""The gateway's metrics: what clients see."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

TIME_TO_FIRST_TOKEN = Histogram(
    "livelens_gateway_time_to_first_token_seconds", "A question accepted -> its first answer text relayed",
    buckets=LATENCY_BUCKETS)
E2E_ANSWER = Histogram(
    "livelens_gateway_e2e_request_latency_seconds", "A question accepted -> its final answer relayed",
    buckets=LATENCY_BUCKETS)
FRAMES = Counter("livelens_gateway_frames", "Frames accepted, per tenant", ["tenant"])
QUESTIONS = Counter("livelens_gateway_questions", "Questions accepted, per tenant", ["tenant"])
REFUSED = Counter("livelens_gateway_refused", "Items refused, per tenant and status", ["tenant", "status"])
OPEN_STREAMS = Gauge("livelens_gateway_open_streams", "Streams open on this replica, per tenant", ["tenant"])
ALERTS = Counter("livelens_gateway_alerts", "Proactive alerts raised", ["reason"])
FRAMES_FOLDED = Counter("livelens_gateway_frames_folded", "Acknowledged frames folded into a later one (the stream "
                        "fell behind), told to their Watch, per tenant and reason", ["tenant", "reason"])
