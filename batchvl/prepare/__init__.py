"""From an input row to an engine request: chat templates and prompts, chat-message rows, the row preparer,
and the prefetcher that runs preparation ahead of the engine in bounded memory."""
