"""Model-output parsers: reasoning (`<think>`) and GLM tool calls, whole-text and streaming."""
