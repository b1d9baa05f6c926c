"""Stand-in for ComfyUI's folder_paths: a models dir and an output dir that tests point at tmp folders."""

import os
import re

models_dir = os.path.join(os.getcwd(), "models")
output_directory = os.path.join(os.getcwd(), "output")
folder_names_and_paths = {}


def add_model_folder_path(name, path, is_default=False):
    paths, exts = folder_names_and_paths.setdefault(name, ([], set()))
    if path not in paths:
        paths.insert(0, path) if is_default else paths.append(path)


def get_folder_paths(name):
    return list(folder_names_and_paths[name][0])


def get_output_directory():
    return output_directory


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """(folder, file stem, next counter, subfolder, prefix); counter = 1 + highest `<stem>_NNNNN_` present."""
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((os.path.abspath(output_dir), os.path.abspath(folder))) != os.path.abspath(output_dir):
        raise Exception("Saving outside the output folder is not allowed.")
    os.makedirs(folder, exist_ok=True)
    pat = re.compile(re.escape(filename) + r"_(\d{5})_")
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pat.match(f))]
    return folder, filename, max(used, default=0) + 1, subfolder, filename_prefix
