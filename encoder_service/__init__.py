"""encoder_service package."""
