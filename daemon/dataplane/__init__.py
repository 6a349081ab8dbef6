"""The data plane, where a frame goes: camera -> [slot] -> engine worker -> [slot] -> output
worker -> virtual camera / preview / recording; latest frame wins, never a growing queue."""
