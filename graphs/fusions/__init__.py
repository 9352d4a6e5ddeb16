"""One fused op per module, each as find -> check -> build."""
