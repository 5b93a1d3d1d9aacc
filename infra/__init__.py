"""Running things: the sample world and its HTTP server, the local Ray head, the demo."""
