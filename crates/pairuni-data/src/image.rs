//! Image paths and image files: resolving record paths, loading as RGB8, saving PNG atomically.
//!
//! Record image paths are relative to the folder of the JSONL file that holds the record, so a pool folder can
//! be moved or copied as a whole. Absolute paths are kept as they are.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};

pub use ::image::{Rgb, RgbImage};

use crate::atomic::write_atomic_bytes;
use crate::error::DataError;

/// Resolves a record's image path against the folder of the JSONL file that holds it.
pub fn resolve(jsonl_path: impl AsRef<Path>, rel: &str) -> PathBuf {
    match jsonl_path.as_ref().parent() {
        Some(dir) => dir.join(rel),
        None => PathBuf::from(rel),
    }
}

/// Loads a PNG or JPEG image and converts it to RGB8 (alpha dropped, grey expanded).
///
/// A missing or unreadable file gives [`DataError::Io`]; a file that does not decode gives [`DataError::Image`].
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, DataError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_rgb(&bytes).map_err(|message| DataError::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// Loads the image a record names, with errors that name the JSONL file, the line and the field.
///
/// `field` is the dotted field path of the image path, e.g. `understand_ann.image_path`.
pub fn load_record_image(
    jsonl_path: impl AsRef<Path>,
    line: usize,
    field: &str,
    rel: &str,
) -> Result<RgbImage, DataError> {
    let jsonl_path = jsonl_path.as_ref();
    let image = resolve(jsonl_path, rel);
    load_rgb(&image).map_err(|err| in_record(err, jsonl_path, line, field))
}

/// Re-labels an error from [`load_rgb`] as a problem of the record at `jsonl_path:line`, field `field`.
pub fn in_record(err: DataError, jsonl_path: &Path, line: usize, field: &str) -> DataError {
    match err {
        DataError::Io { path, source } if source.kind() == io::ErrorKind::NotFound => {
            DataError::MissingImage {
                path: jsonl_path.to_path_buf(),
                line,
                field: field.to_owned(),
                image: path,
            }
        }
        DataError::Io { path, source } => DataError::BadImage {
            path: jsonl_path.to_path_buf(),
            line,
            field: field.to_owned(),
            image: path,
            message: source.to_string(),
        },
        DataError::Image { path, message } => DataError::BadImage {
            path: jsonl_path.to_path_buf(),
            line,
            field: field.to_owned(),
            image: path,
            message,
        },
        other => other,
    }
}

/// Decodes PNG or JPEG bytes (format guessed from the content, not the name) into RGB8.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    let reader = ::image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a PNG or JPEG image".to_owned());
    }
    let decoded = reader.decode().map_err(|e| e.to_string())?;
    Ok(decoded.into_rgb8())
}

/// Encodes an RGB8 image as PNG bytes.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ::image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Saves an RGB8 image as PNG atomically (creating parent folders).
pub fn save_png_atomic(path: impl AsRef<Path>, image: &RgbImage) -> Result<(), DataError> {
    let path = path.as_ref();
    let bytes = encode_png(image).map_err(|message| DataError::Image {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomic_bytes(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_is_relative_to_the_jsonl_folder() {
        assert_eq!(
            resolve("/data/pool/pairs.jsonl", "images/a.png"),
            PathBuf::from("/data/pool/images/a.png")
        );
        assert_eq!(
            resolve("pairs.jsonl", "images/a.png"),
            PathBuf::from("images/a.png")
        );
        assert_eq!(
            resolve("/data/pairs.jsonl", "/abs/a.png"),
            PathBuf::from("/abs/a.png")
        );
    }

    #[test]
    fn png_round_trip_and_jpeg_and_grey_load_as_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(5, 3, |x, y| ::image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = dir.path().join("sub/a.png");
        save_png_atomic(&png, &img).unwrap();
        assert_eq!(load_rgb(&png).unwrap(), img);

        // JPEG is lossy: check the shape and that the file decodes under a misleading name.
        let jpg = dir.path().join("b.png");
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), ::image::ImageFormat::Jpeg)
            .unwrap();
        std::fs::write(&jpg, bytes).unwrap();
        let loaded = load_rgb(&jpg).unwrap();
        assert_eq!(loaded.dimensions(), (5, 3));

        let grey = ::image::GrayImage::from_pixel(2, 2, ::image::Luma([9]));
        let grey_path = dir.path().join("g.png");
        grey.save(&grey_path).unwrap();
        assert_eq!(load_rgb(&grey_path).unwrap().get_pixel(1, 1).0, [9, 9, 9]);
    }

    #[test]
    fn record_image_errors_name_file_line_field_and_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("pairs.jsonl");
        let err = load_record_image(&jsonl, 4, "understand_ann.image_path", "images/nope.png")
            .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), crate::ProblemKind::MissingImage);
        assert!(
            text.starts_with(&format!(
                "{}:4: field understand_ann.image_path:",
                jsonl.display()
            )),
            "{text}"
        );
        assert!(
            text.contains(&dir.path().join("images/nope.png").display().to_string()),
            "{text}"
        );

        std::fs::write(dir.path().join("junk.png"), b"this is not a png").unwrap();
        let err = load_record_image(&jsonl, 2, "image_path", "junk.png").unwrap_err();
        assert_eq!(err.kind(), crate::ProblemKind::BadImage);
        assert!(err.to_string().starts_with(&format!(
            "{}:2: field image_path: cannot read image",
            jsonl.display()
        )));
    }
}
