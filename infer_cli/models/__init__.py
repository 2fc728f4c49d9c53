"""Where models come from: references and models.toml, the local store, the hub, the GGUF header reader."""
