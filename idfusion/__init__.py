"""IDFusion library code: the paper's math (fusion), adapter, identity encoding, ComfyUI patching."""
