"""moe-server's HTTP side: OpenAI's API over the batch engine (engine/batch.py), FastAPI and uvicorn."""
