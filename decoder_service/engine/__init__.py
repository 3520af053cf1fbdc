"""The decoder engine: continuous batching over a paged KV cache, with images and video.

Read in order: ``request.py`` (state), ``block_pool.py`` / ``kv_cache_manager.py`` (KV blocks and
prefix cache), ``scheduler.py`` (``SchedulerOutput``), ``model_runner.py`` (one step on the model),
``sampler.py``, ``detokenizer.py``, ``engine.py`` (``LLMEngine.step``).
"""
