"""Training of the models livelens ships (the vision projector: `livelens.train.projector`)."""
