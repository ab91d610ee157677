"""Code the services share: their Kafka plumbing, metrics, health server, logging,
ports, frame preprocessing and the classifier's label words."""
