"""UniRoute Gateway: an OpenAI-compatible LLM proxy with learned routing."""

import os as _os

# LiteLLM reaches for the network at import time unless told not to. These must be set
# before anything imports litellm; every entry point imports this package first.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
_os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
