"""GLM-4.5V / GLM-4.6V (``glm4v_moe``): config, vision tower, MoE text decoder, processor, loader."""
