"""decoder_service package."""
