"""The client API (HTTP and websockets) served by FastAPI."""
