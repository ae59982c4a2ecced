"""The HTTP side: FastAPI routers, one per endpoint family, and what every route shares (the server's
state, API keys, request ids, errors in OpenAI's shape, server-sent events). Routes validate with the
schemas in models.py and hand the work to serving/; nothing here touches the engine's tensors."""
