"""Node registry: one module per node family. Classic INPUT_TYPES nodes load on both pinned hosts
(ComfyUI 0.3.52 and 0.3.75); see README."""
from . import adapter_nodes, apply_nodes, eval_nodes, example_nodes, face_nodes, identity_nodes, model_nodes, pose_nodes, repaint_nodes, train_nodes

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (adapter_nodes, identity_nodes, apply_nodes, face_nodes, repaint_nodes, eval_nodes, train_nodes, model_nodes, pose_nodes,
                example_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
