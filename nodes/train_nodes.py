"""The training node, kept apart from the inference nodes: trains Linear_kf / Linear_vf on a dataset folder
and writes only inside models/idfusion (the adapter, plus training/ for its state and loss curve)."""
import os

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from PIL import Image

from ..idfusion.dataset import FaceDataset
from ..idfusion.train import TrainConfig, Trainer
from .common import CATEGORY, FOLDER, check_inputs, check_name, require_inputs

DATASETS = "idfusion_datasets"


# the pack's own tiny example dataset (scripts/make_example_dataset.py), so the training template trains as shipped
EXAMPLE_DATASETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "assets", "datasets")


def _dataset_roots() -> list[str]:
    return [os.path.join(folder_paths.get_input_directory(), DATASETS), EXAMPLE_DATASETS]  # the user's folder wins


def dataset_folders() -> list[str]:
    names = {d for root in _dataset_roots() if os.path.isdir(root)
             for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    return sorted(names)


def dataset_path(name: str) -> str:
    return next(p for p in (os.path.join(r, name) for r in _dataset_roots()) if os.path.isdir(p))


class IDFusionTrainAdapter:
    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model (frozen): an SD1.5/SDXL-style UNet, or a Flux DiT (ComfyUI 0.3.75 or newer). The adapter is shaped for it."}),
            "clip": ("CLIP", {"tooltip": "Encodes the captions (frozen)."}),
            "vae": ("VAE", {"tooltip": "Encodes targets and references (frozen)."}),
            "dataset": (dataset_folders(), {"tooltip": f"A folder in ComfyUI/input/{DATASETS}/ (or the pack's example_synthetic_faces): images with .txt captions, "
                        "optional identity subfolders and optional <name>_mask.png face masks."}),
            "adapter_name": ("STRING", {"default": "my_idfusion", "tooltip": "Saved as models/idfusion/<name>.safetensors (letters, digits, '_', '-')."}),
            "steps": ("INT", {"default": d.steps, "min": 1, "max": 1_000_000, "tooltip": "Total optimisation steps (a resumed run continues to this)."}),
            "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 64, "tooltip": "Images per step."}),
            "learning_rate": ("FLOAT", {"default": d.lr, "min": 1e-7, "max": 1e-2, "step": 1e-6, "tooltip": "AdamW learning rate."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Images are centre-cropped to this square size."}),
            "save_every": ("INT", {"default": d.save_every, "min": 1, "max": 100_000, "tooltip": "Checkpoint interval (atomic writes)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seeds every random draw; a resumed run repeats an uninterrupted one."}),
            "init": (["attn1", "zeros", "random"], {"tooltip": "Initialisation of a new adapter (ignored when resuming)."}),
            "reference": (["other image", "same image"], {"tooltip": "Reference = another image of the same identity folder, or the sample's own face crop (augmented)."}),
            "reference_dropout": ("FLOAT", {"default": d.reference_dropout, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Share of samples trained without identity keys, so CFG can amplify the identity."}),
            "face_loss_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.1, "tooltip": "Masked diffusion loss (FaceSnap Eq. 3): extra weight on the face mask."}),
            "cgdr_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.1, "tooltip": "Class-guided regularisation (Face2Diffusion): outside the face, follow the class prompt's prediction."}),
            "class_prompt": ("STRING", {"default": d.class_prompt, "tooltip": "The class prompt for cgdr."}),
            "encoding": (["cached", "per_step"], {"tooltip": "How references are encoded: clean once (cached) or noised to the target's sigma (per_step). Written into the adapter."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from models/idfusion/training/<name>.train-state.safetensors if it exists."}),
        }, "optional": {   # after the required ones: workflows saved before these existed keep their widget values
            "lr_decay_steps": ("INT", {"default": d.lr_decay_steps, "min": 0, "max": 1_000_000, "tooltip": "The last N steps lower the learning rate to zero on a half cosine (0: constant after warm-up). At most `steps`."}),
            "reference_shift": ("FLOAT", {"default": d.reference_shift, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip": "Reference augmentation: move each reference by up to this fraction of its side (edge pixels repeated), so a face off-centre still transfers."}),
            "reference_noise": ("FLOAT", {"default": d.reference_noise, "min": 0.0, "max": 100.0, "step": 0.5, "tooltip": "Reference augmentation: Gaussian pixel noise of this standard deviation (0-255 units) on each reference."}),
            "reference_background": ("FLOAT", {"default": d.reference_background, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Reference augmentation: the chance that a reference's background (outside its <name>_mask.png) becomes a random colour. Needs masks."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IDFUSION_ADAPTER", "IMAGE")
    RETURN_NAMES = ("adapter", "loss_curve")
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = CATEGORY + "/training"
    DESCRIPTION = "Trains an IDFusion adapter (only Linear_kf/Linear_vf). Cancel keeps the last checkpoint; run again to resume."

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate=None, reference_dropout=None, face_loss_weight=None, cgdr_weight=None,
                        reference_shift=None, reference_noise=None, reference_background=None):
        """JSON NaN passes ComfyUI's min/max check and would train an adapter of NaN weights: refuse it up front."""
        return check_inputs(cls, learning_rate=learning_rate, reference_dropout=reference_dropout,
                            face_loss_weight=face_loss_weight, cgdr_weight=cgdr_weight, reference_shift=reference_shift,
                            reference_noise=reference_noise, reference_background=reference_background)

    def train(self, model, clip, vae, dataset, adapter_name, steps, batch_size, learning_rate, resolution, save_every, seed,
              init, reference, reference_dropout, face_loss_weight, cgdr_weight, class_prompt, encoding, resume, unique_id=None,
              lr_decay_steps=0, reference_shift=0.0, reference_noise=0.0, reference_background=0.0):
        check_name("adapter_name", adapter_name, spaces=False, where="the adapter is always saved in models/idfusion")
        require_inputs(type(self), learning_rate=learning_rate, reference_dropout=reference_dropout,
                       face_loss_weight=face_loss_weight, cgdr_weight=cgdr_weight, steps=steps, batch_size=batch_size,
                       resolution=resolution, save_every=save_every, seed=seed, lr_decay_steps=lr_decay_steps,
                       reference_shift=reference_shift, reference_noise=reference_noise,
                       reference_background=reference_background)
        check_name("dataset", dataset, where=f"pick a folder of ComfyUI/input/{DATASETS}/", folder=True)
        if dataset not in dataset_folders():
            raise ValueError(f"dataset {dataset!r} is not a folder in ComfyUI/input/{DATASETS}/: put the images there "
                             "and refresh the node list.")
        # ComfyUI runs nodes under torch.inference_mode(); training needs autograd (as comfy_extras/nodes_train.py does)
        with torch.inference_mode(False), torch.enable_grad():
            return self._train(model, clip, vae, dataset, adapter_name, steps, batch_size, learning_rate, resolution,
                               save_every, seed, init, reference, reference_dropout, face_loss_weight, cgdr_weight,
                               class_prompt, encoding, resume, unique_id,
                               dict(lr_decay_steps=lr_decay_steps, reference_shift=reference_shift,
                                    reference_noise=reference_noise, reference_background=reference_background))

    def _train(self, model, clip, vae, dataset, adapter_name, steps, batch_size, learning_rate, resolution, save_every, seed,
               init, reference, reference_dropout, face_loss_weight, cgdr_weight, class_prompt, encoding, resume, unique_id,
               more):
        root = folder_paths.get_folder_paths(FOLDER)[0]
        work = os.path.join(root, "training")
        os.makedirs(work, exist_ok=True)
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=learning_rate, save_every=save_every, seed=seed, init=init,
                          reference=reference, reference_dropout=reference_dropout, face_loss_weight=face_loss_weight,
                          cgdr_weight=cgdr_weight, class_prompt=class_prompt, encoding=encoding, **more)
        ds = FaceDataset(dataset_path(dataset), resolution)
        node = str(unique_id) if unique_id is not None else None
        skipped = [f"skipped {len(ds.skipped)} of {len(ds.skipped) + len(ds)} files in '{dataset}':"] + ds.skipped_report() \
            if ds.skipped else []
        if skipped:  # on the node right away (progress text), and in its output below, not only on the console
            _send(node, "\n".join(skipped), None)
        trainer = Trainer(model, clip, vae, ds, work, adapter_name, cfg)
        if not resume and os.path.exists(trainer.state_path):
            os.remove(trainer.state_path)
        trainer.resume()
        pbar = comfy.utils.ProgressBar(steps)
        pbar.update_absolute(trainer.step, steps)

        def on_step(step, loss):
            pbar.update_absolute(step, steps)
            _send(node, f"step {step}/{steps}  loss {loss:.4f}", {"node": node, "step": int(step), "steps": int(steps), "loss": float(loss)})

        trainer.run(on_step=on_step, should_stop=comfy.model_management.throw_exception_if_processing_interrupted)
        final = os.path.join(root, f"{adapter_name}.safetensors")
        trainer.adapter.save(final)  # the loadable adapter, next to the others
        curve = os.path.join(work, f"{adapter_name}.loss.png")
        image = torch.from_numpy(np.asarray(Image.open(curve).convert("RGB"), dtype=np.float32) / 255.0)[None]
        adapter = trainer.adapter.cpu().requires_grad_(False)  # inference from here on
        # the whole history, resumed steps included, for the page's loss chart (js/ reads ui.idfusion_loss)
        history = [[int(s), float(l)] for s, l in trainer.losses]
        return {"ui": {"text": [final, *skipped], "idfusion_loss": history, "idfusion_skipped": ds.skipped_report(1000)},
                "result": (adapter, image)}


def _send(node, text, event):
    """The loss as progress text under the node, and an `idfusion.train` event for the page's loss chart. Outside a
    server (tests, scripts) there is no PromptServer.instance: the progress bar is enough."""
    try:
        from server import PromptServer
        server = getattr(PromptServer, "instance", None)
        if server is None:
            return
        sid = getattr(server, "client_id", None)  # the client that queued the prompt, like ComfyUI's progress events
        node = node if node is not None else server.last_node_id
        server.send_progress_text(text, node, sid)
        if event is not None:
            server.send_sync("idfusion.train", {**event, "node": node}, sid)
    except Exception:  # a display message must never stop a training run
        pass


NODE_CLASS_MAPPINGS = {"IDFusionTrainAdapter": IDFusionTrainAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionTrainAdapter": "IDFusion Train Adapter"}
