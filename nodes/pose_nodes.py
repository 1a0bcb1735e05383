"""Pose node: keypoint and landmark images from a face analysis, for keypoint/pose ControlNets next to IDFusion."""
import logging

from ..idfusion import faces as F
from ..idfusion import pose as P
from .common import CATEGORY
from .face_nodes import FACE_ANALYSIS, run, to_image, to_uint8

log = logging.getLogger("IDFusion")


class IDFusionFacePose:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "From IDFusion Load Face Analysis: an insightface pack (the Haar "
                              "fallback gives no keypoints). Its 2d106det/1k3d68 models, when present, give the landmark image."}),
            "image": ("IMAGE", {"tooltip": "Photo(s) whose face pose to copy; each image of the batch gives one pose image of its size."}),
            "faces": (["one face", "all faces"], {"tooltip": "Draw only the face picked by order and index, or every face found."}),
            "order": (list(F.ORDERS), {"tooltip": "How faces are numbered for 'one face': by size, left to right, or by confidence."}),
            "index": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "Which face in that order (0 = first), for 'one face'."}),
            "landmarks": (["106 points", "68 points"], {"tooltip": "Which dense landmark model to prefer for the landmark image "
                          "(the other is used if the pack lacks it)."}),
            "no_face": (["error", "black image"], {"tooltip": "When an image has no face (or no face at index): stop with an "
                        "error, or return black pose images for it (the ControlNet then adds no pose)."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("keypoints", "landmarks")
    OUTPUT_TOOLTIPS = ("InstantID-format keypoints on black (eyes red/green, nose blue, mouth corners yellow/magenta, "
                       "limbs to the nose): feed a keypoints ControlNet such as InstantID's.",
                       "Dense face landmarks as white points on black (68-point sets with contour lines); black when the "
                       "pack has no landmark model.")
    FUNCTION = "draw"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Pose images from the detected face(s), to fix head pose with a keypoints or pose ControlNet while IDFusion "
                   "gives the identity.")

    def draw(self, face_analysis, image, faces, order, index, landmarks, no_face):
        if getattr(face_analysis, "kind", None) == "haar":
            raise ValueError("The OpenCV Haar fallback finds faces but gives no keypoints, so no pose can be drawn. Load an "
                             "insightface pack (antelopev2 or buffalo_l) with IDFusion Load Face Analysis.")
        kps_images, lmk_images, missing_dense = [], [], False
        for n, rgb in enumerate(to_uint8(image)):
            h, w = rgb.shape[:2]
            found = run(face_analysis.detect, rgb)
            chosen = F.order_faces(found, order) if faces == "all faces" else [f for f in [run(F.pick, found, order, index)] if f is not None]
            if not chosen:
                what = f"image {n} of the batch has {len(found)} face(s)" + ("" if faces == "all faces" else f", none at index {index} ({order})")
                if no_face == "error":
                    raise ValueError(f"{what}. Use another image, lower index, or set no_face to 'black image'.")
                log.warning("IDFusion Face Pose: %s; black pose images.", what)
            if any(f.kps is None for f in chosen):
                raise ValueError(f"The face model '{face_analysis.name}' gave no 5-point keypoints for image {n}; load a pack "
                                 f"whose detector gives them (SCRFD/RetinaFace, as in antelopev2 or buffalo_l).")
            kps_images.append(P.draw_kps(h, w, [f.kps for f in chosen]))
            dense = [run(P.dense_landmarks, face_analysis, rgb, f, landmarks.split()[0]) for f in chosen]
            missing_dense |= any(d is None for d in dense)
            lmk_images.append(P.draw_landmarks(h, w, [d for d in dense if d is not None]))
        if missing_dense:
            log.warning("IDFusion Face Pose: face model '%s' has no 106- or 68-point landmark model (2d106det.onnx, "
                        "1k3d68.onnx); the landmark image is black.", face_analysis.name)
        return (to_image(kps_images), to_image(lmk_images))


NODE_CLASS_MAPPINGS = {"IDFusionFacePose": IDFusionFacePose}
NODE_DISPLAY_NAME_MAPPINGS = {"IDFusionFacePose": "IDFusion Face Pose (keypoints, landmarks)"}
