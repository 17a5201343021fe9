//! Images for vision models: bytes in any of the formats clients send (PNG, JPEG, WebP,
//! GIF's first frame) decoded with the `image` crate, then made into the pixel tensor a
//! vision tower reads, as the model's own processor makes it (Gemma 3's: transparency over
//! white, a bilinear resize to the tower's square, values scaled to 0..1 and normalised per
//! channel).

use image::{DynamicImage, ImageReader, Limits};
use std::io::Cursor;

use super::{Error, Result};

/// The largest side of an image we decode: beyond any camera, small enough that decoding
/// one cannot exhaust memory (a 16k x 16k RGBA image is 1 GiB).
pub const MAX_SIDE: u32 = 16_384;

/// Decodes an image, refusing unknown formats, truncated data and images too large to hold.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    let bad = |e: &dyn std::fmt::Display| Error::Image(e.to_string());
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(&e))?;
    if reader.format().is_none() {
        return Err(Error::Image(
            "unknown image format (PNG, JPEG, WebP and GIF are read)".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    reader.decode().map_err(|e| bad(&e))
}

/// How a model's processor turns an image into pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// The side of the square the image is resized to.
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// The pixel values `[3][size][size]` (channel-major, rows then columns): transparency
    /// composited over white, resized bilinearly (with the filter widened when shrinking, as
    /// PIL's bilinear resize does), each channel `(v / 255 - mean) / std`.
    pub fn pixels(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = over_white(img);
        let s = self.size;
        let resized = if rgb.dimensions() == (s, s) {
            rgb
        } else {
            image::imageops::resize(&rgb, s, s, image::imageops::FilterType::Triangle)
        };
        let plane = (s * s) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in resized.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// RGB with any alpha composited over white (what a transparent PNG looks like in a chat).
fn over_white(img: &DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = p[3] as u32;
        let mix = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, ImageFormat, Rgba, RgbaImage};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    const HALF: Preprocess = Preprocess {
        size: 4,
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    #[test]
    fn known_pixels_at_the_towers_size_are_only_normalised() {
        // Red, green, blue, white, black and a mid grey: (v / 255 - 0.5) / 0.5.
        let colours = [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 255],
            [0, 0, 0],
            [51, 102, 204],
        ];
        let img =
            image::RgbImage::from_fn(4, 4, |x, y| image::Rgb(colours[((y * 4 + x) % 6) as usize]));
        let png = encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let px = HALF.pixels(&decode(&png).unwrap());
        assert_eq!(px.len(), 48);
        for i in 0..16 {
            let rgb = colours[i % 6];
            for c in 0..3 {
                let want = rgb[c] as f32 / 255.0 * 2.0 - 1.0;
                assert_eq!(px[c * 16 + i], want, "pixel {i} channel {c}");
            }
        }
        // 51/255 = 0.2 exactly in the scaled value: -0.6.
        assert!((px[5] - -0.6).abs() < 1e-6);
    }

    #[test]
    fn every_format_decodes_and_resizing_keeps_flat_colour() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            37,
            23,
            image::Rgb([200, 100, 50]),
        ));
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ] {
            let decoded = decode(&encode(&img, format)).unwrap();
            assert_eq!(decoded.dimensions(), (37, 23), "{format:?}");
            let px = HALF.pixels(&decoded);
            assert_eq!(px.len(), 48);
            // Lossy JPEG and GIF's palette move a flat colour by a few levels at most.
            for (c, want) in [200f32, 100., 50.].iter().enumerate() {
                for &v in &px[c * 16..(c + 1) * 16] {
                    let level = (v * 0.5 + 0.5) * 255.0;
                    assert!(
                        (level - want).abs() <= 4.0,
                        "{format:?} channel {c}: {level}"
                    );
                }
            }
        }
    }

    #[test]
    fn transparency_is_white_and_bad_data_is_an_error() {
        let mut img = RgbaImage::from_pixel(2, 2, Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 1, Rgba([0, 0, 0, 255]));
        let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
        let p = Preprocess { size: 2, ..HALF };
        let px = p.pixels(&decode(&png).unwrap());
        assert_eq!(&px[..4], &[1.0, 1.0, 1.0, -1.0]);
        for bad in [&b"not an image"[..], &png[..png.len() / 2], b""] {
            assert!(matches!(decode(bad), Err(Error::Image(_))));
        }
    }
}
