"""Speech to text around the engine: audio decoding, Whisper loading, long audio as 30 s windows, and
subtitle formats. The engine's Whisper runner lives in batching.families; the endpoint in serving."""
