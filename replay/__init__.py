"""The replay upstream: an OpenAI-compatible server answering as the LLMs of a routing benchmark did."""
