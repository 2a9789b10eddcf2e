"""Stand-ins, not engines: an OpenAI-compatible teacher on 127.0.0.1 (stub_server.py: chat completions, its
per-minute limits, files and the Batch API) for the tests, the benchmarks and a keyless try-out. The real client
code path (llm/openai.py, llm/batch_api.py) talks to it over HTTP as to any endpoint."""
