class PreviewUI3D:
    def __init__(self, model_file, camera_info, **kwargs):
        self.model_file, self.camera_info = model_file, camera_info

    def as_dict(self):
        return {"result": [self.model_file, self.camera_info]}
