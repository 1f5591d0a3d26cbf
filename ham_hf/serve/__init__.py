"""The serving stage: the loaded classifier, its out-of-distribution guard, ONNX / int8 export, the heat map."""
