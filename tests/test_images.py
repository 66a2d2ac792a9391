"""pangu_draw_ms.images: loading with clear errors, resizing to a bucket, model arrays, edge maps, grids."""
import ast
import pathlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from pangu_draw_ms import images
from pangu_draw_ms.images import edge_map, image_grid, image_size, load_image, resize, to_array, to_pil, to_unit_array


def random_pixels(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_the_module_is_a_leaf_importing_numpy_and_pil_only():
    tree = ast.parse(pathlib.Path(images.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 if node.level == 0}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert imported == {"__future__", "math", "os", "typing", "numpy", "PIL"}


def test_pil_to_array_and_back_is_exact_on_every_uint8_value():
    pixels = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    pixels = pixels.astype(np.uint8)
    array = to_array([Image.fromarray(pixels), Image.fromarray(pixels[::-1])])
    assert array.dtype == np.float32 and array.shape == (2, 3, 16, 16) and array.flags.c_contiguous
    assert array.min() == -1.0 and array.max() == 1.0
    back = to_pil(array)
    np.testing.assert_array_equal(np.asarray(back[0]), pixels)
    np.testing.assert_array_equal(np.asarray(back[1]), pixels[::-1])
    unit = to_unit_array(Image.fromarray(pixels))
    assert unit.dtype == np.float32 and unit.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(unit[0], pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)


def test_to_pil_rounds_to_nearest_and_clips():
    assert np.asarray(to_pil(np.full((1, 3, 8, 8), 2.0, np.float32))[0]).min() == 255
    assert np.asarray(to_pil(np.full((1, 3, 8, 8), -3.0, np.float32))[0]).max() == 0
    # (0.502 + 1) * 127.5 = 191.505: rounded to 192, not truncated to 191.
    assert np.asarray(to_pil(np.full((1, 3, 8, 8), 0.502, np.float32))[0])[0, 0, 0] == 192


def test_load_image_takes_paths_pil_images_and_uint8_arrays(tmp_path):
    pixels = random_pixels(12, 20)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    for source in (str(path), path, Image.fromarray(pixels), Image.fromarray(pixels).convert("RGBA"), pixels):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (20, 12)
        np.testing.assert_array_equal(np.asarray(image), pixels)
    grey = load_image(pixels[..., 0])
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(pixels[..., :1], 3, axis=2))
    assert image_size(path) == (12, 20)


def test_load_image_names_a_missing_file_and_a_file_that_is_not_an_image(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=f"image file '{missing}' does not exist"):
        load_image(str(missing))
    garbage = tmp_path / "notes.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(UnidentifiedImageError, match=f"'{garbage}' is not an image"):
        load_image(garbage)
    with pytest.raises(OSError, match="is not an image"):  # read_manifest counts it as an unreadable image
        image_size(garbage)


@pytest.mark.parametrize("array, shown", [
    (np.zeros((16, 16, 3), np.float32), r"dtype float32 and shape \(16, 16, 3\)"),
    (np.zeros((3, 16, 16), np.uint8), r"dtype uint8 and shape \(3, 16, 16\)"),
    (np.zeros((16, 16, 4), np.uint8), r"dtype uint8 and shape \(16, 16, 4\)"),
    (np.zeros((3, 3), np.uint8), r"dtype uint8 and shape \(3, 3\)"),
    (np.zeros(64, np.uint8), r"dtype uint8 and shape \(64,\)"),
])
def test_load_image_refuses_arrays_that_are_not_images_saying_what_is_valid(array, shown):
    valid = r"pass a PIL image, an image file's path or a uint8 array \(H, W, 3\) .* each side at least 8"
    with pytest.raises(TypeError, match=f"init_image is an array of {shown}; {valid}"):
        load_image(array, "init_image")


def test_load_image_refuses_other_values():
    with pytest.raises(TypeError, match="image is a list; pass a PIL image"):
        load_image([[0, 0, 0]])


def test_resize_stretches_to_the_bucket_or_covers_and_crops_its_centre():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the middle third is white
    image = Image.fromarray(wide)
    stretched = resize(image, (32, 48))
    assert stretched.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(stretched), np.asarray(image.resize((48, 32), Image.BICUBIC)))
    assert resize(image, (20, 60)).tobytes() == image.tobytes()
    cropped = resize(image, (10, 10), crop=True)  # scaled to 30 x 10, then its centre 10 x 10: the white third
    assert cropped.size == (10, 10)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image.resize((30, 10), Image.BICUBIC))[:, 10:20])
    assert np.asarray(cropped)[:, 1:-1].min() == 255
    assert resize(image, (40, 30), crop=True).size == (30, 40)


def test_image_grid_lays_images_out_row_by_row_in_cells_of_the_largest_size():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    cells = [Image.new("RGB", (10, 6), colour) for colour in colours]
    assert image_grid(cells).size == (30, 12)  # 5 images: 3 columns, 2 rows
    grid = image_grid(cells, columns=2)
    assert grid.size == (20, 18)
    assert [grid.getpixel((col * 10 + 5, row * 6 + 3)) for row in range(3) for col in range(2)] == colours + [
        (255, 255, 255)]
    mixed = image_grid([np.zeros((8, 8, 3), np.uint8), Image.new("RGB", (12, 10), "red")], columns=1)
    assert mixed.size == (12, 20) and mixed.getpixel((10, 5)) == (255, 255, 255)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])


def test_edge_map_of_a_filled_square_is_its_border_only():
    pixels = np.zeros((1, 3, 16, 16), np.float32)
    pixels[:, :, 4:12, 4:12] = 1.0
    edges = edge_map(pixels)
    assert edges.dtype == np.float32 and edges.shape == (1, 3, 16, 16)
    # A pixel is an edge where its right or lower neighbour differs: the column left of the square and its
    # last column, the row above it and its last row.
    expected = np.zeros((16, 16), np.float32)
    expected[4:12, 3] = expected[4:12, 11] = expected[3, 4:12] = expected[11, 4:12] = 1.0
    for channel in range(3):
        np.testing.assert_array_equal(edges[0, channel], expected)
    with pytest.raises(ValueError, match=r"edge_map takes images \(B, 3, H, W\) in \[0, 1\], got shape \(16, 16\)"):
        edge_map(np.zeros((16, 16)))
