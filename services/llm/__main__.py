from livelens.config import load_config
from livelens.logs import setup_logging
from services.llm.service import main

# The guard matters: vLLM's engine core starts in a spawned process that re-imports this.
if __name__ == "__main__":
    setup_logging()
    main(load_config())
