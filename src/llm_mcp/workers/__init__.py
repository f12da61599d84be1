"""Worker processes: one per loaded model. The server side (pool) never imports torch; the worker side does."""
