from livelens.config import load_config
from livelens.logs import setup_logging
from services.encoder.service import main

if __name__ == "__main__":
    setup_logging()
    main(load_config())
