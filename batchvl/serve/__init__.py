"""`batchvl serve`: an OpenAI-compatible HTTP server over one engine (chat completions, streaming, the Batch API).

The path of a request: `app` (routes, errors, limits) -> `protocol` (OpenAI's format, checked) -> `model` (the
messages become an engine Request exactly as a `batchvl run` row does) -> `scheduler` (the one thread that owns
the engine; requests share its batches) -> back through `chat` as a body or server-sent events. `batches`
runs the Batch API's batches as batchvl jobs whose rows go through the same scheduler. `launch` builds it all.
"""
