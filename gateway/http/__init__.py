"""HTTP handlers: parse the request, call the service or the store, shape the response. No business logic."""
