"""What runs livelens on one machine and builds what it serves, apart from the client SDK:
the local stack and its infrastructure launchers (`livelens up`), the benchmarks
(`livelens bench`), model building and import (`livelens models`, `make models`) and
projector training. Needs the extras: `pip install "livelens[server,bench,models]"`."""
