"""Stand-in for comfy.utils.ProgressBar: records (value, total) updates."""

updates = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = value
        updates.append((value, self.total))

    def update(self, value):
        self.update_absolute(self.current + value)
