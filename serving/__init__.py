"""The OpenAI endpoints' logic over the engine, free of HTTP: one module per endpoint family (chat,
completions, transcription) turning validated requests into engine sequences and engine output into
response objects; reasoning parsing; errors as APIError; request deadlines."""
