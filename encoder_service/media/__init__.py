"""Media sources (fetch, data: URLs, local files, address policy) and decoding for the encoder."""
