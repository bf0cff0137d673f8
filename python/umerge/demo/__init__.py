"""The built-in default of `umerge demo`: a synthetic LUME-like world and the end-to-end pipeline.

`umerge.demo.world` generates the data set (pure Python, no torch); `umerge.demo.pipeline` trains a
tiny OLMo on it, unlearns with the paper's two presets, merges, evaluates and writes the report
(needs the `train` extra). Only the world is imported here, so `import umerge.demo` stays light.
"""

from __future__ import annotations

from umerge.demo.world import World, WorldConfig, generate_world, write_world

__all__ = ["World", "WorldConfig", "generate_world", "write_world"]
