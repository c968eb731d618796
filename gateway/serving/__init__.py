"""The request path: chat service, forwarding, cooldown, registry, policy loading. No HTTP, no SQL."""
