"""The encoder's histograms (its counters are its stats, `services.common.metrics`)."""

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

FRAME_TO_TOKENS = Histogram(
    "livelens_encoder_frame_to_tokens_seconds", "A frame accepted by the gateway -> its tokens published",
    buckets=LATENCY_BUCKETS)
TENANT_FRAMES = Counter("livelens_encoder_tenant_frames", "Frames encoded or found unchanged, per tenant",
                        ["tenant"])
FRAMES_FOLDED = Counter("livelens_encoder_frames_folded", "Frames folded into a later one because the encoder was "
                        "behind (encoder.max_frame_age_s), per tenant", ["tenant"])
