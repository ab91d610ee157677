"""Training of the models livelens ships (the vision projector: `livelens.dev.train.projector`)."""
