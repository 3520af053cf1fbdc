"""Model families served by Glimpse. Each subpackage holds one family's config, modules and processor."""
