"""Style only the person or only the room: a person mask from a shipped pretrained segmenter
(MediaPipe's selfie segmentation, run with ai-edge-litert), computed beside the engine thread
and composited at the output."""
