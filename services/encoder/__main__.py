from services.common.logs import setup_logging
from services.common.settings import load_service_config
from services.encoder.service import main

if __name__ == "__main__":
    setup_logging()
    main(load_service_config())
