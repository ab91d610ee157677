from services.common.logs import setup_logging
from services.common.settings import load_service_config
from services.llm.budget import check_context_fits
from services.llm.service import main

# The guard matters: vLLM's engine core starts in a spawned process that re-imports this.
if __name__ == "__main__":
    setup_logging()
    cfg = load_service_config()
    check_context_fits(cfg)
    main(cfg)
