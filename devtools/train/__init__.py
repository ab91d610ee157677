"""Training of the models livelens ships (the vision projector: `devtools.train.projector`)."""
