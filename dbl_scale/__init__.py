"""dbl_scale: distributed image-text matching (DBL and its peers) on DeepSpeed ZeRO, WebDataset
and MLflow. The library is the modules here; the commands are `dbl_scale.cli` (`dbl-scale`)."""
