//! Images for vision models: bytes in any of the formats clients send (PNG, JPEG, WebP,
//! GIF's first frame) decoded with the `image` crate, then made into the pixel tensor a
//! vision tower reads, as the model's own processor makes it: transparency over white, a
//! resize (Gemma 3: bilinear to the tower's square; Qwen-VL: bicubic to multiples of its
//! patches, aspect kept, area bounded), values scaled to 0..1 and normalised per channel.

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

/// The size a model's processor gives an image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    /// A square of this side, reached with a bilinear resize (Gemma 3).
    Square(u32),
    /// Qwen-VL's: the aspect kept, each side rounded to a multiple of `factor`, the area
    /// brought within `min_pixels..=max_pixels`; reached with a bicubic resize.
    Fit {
        factor: u32,
        min_pixels: u32,
        max_pixels: u32,
    },
}

/// How a model's processor turns an image into pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub size: Size,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Pixel values `[3][height][width]` (channel-major, rows then columns).
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub width: usize,
    pub height: usize,
}

/// Images more elongated than this are refused (as Qwen-VL's processor does): the sides
/// could not both stay within the area bounds as multiples of a patch.
const MAX_ASPECT: u32 = 200;

impl Preprocess {
    /// The `(width, height)` an image of `width x height` is resized to.
    pub fn target(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let (factor, min, max) = match self.size {
            Size::Square(s) => return Ok((s, s)),
            Size::Fit {
                factor,
                min_pixels,
                max_pixels,
            } => (factor as f64, min_pixels as f64, max_pixels as f64),
        };
        let (w, h) = (width.max(1), height.max(1));
        if f64::from(w.max(h)) / f64::from(w.min(h)) > f64::from(MAX_ASPECT) {
            return Err(Error::Image(format!(
                "a {width}x{height} image is more than {MAX_ASPECT} times as long as wide"
            )));
        }
        let (w, h) = (w as f64, h as f64);
        // Python's round (half to even), as transformers' smart_resize.
        let round = |v: f64| ((v / factor).round_ties_even() * factor).max(factor);
        let (mut tw, mut th) = (round(w), round(h));
        if tw * th > max {
            let beta = (w * h / max).sqrt();
            tw = ((w / beta / factor).floor() * factor).max(factor);
            th = ((h / beta / factor).floor() * factor).max(factor);
        } else if tw * th < min {
            let beta = (min / (w * h)).sqrt();
            tw = (w * beta / factor).ceil() * factor;
            th = (h * beta / factor).ceil() * factor;
        }
        Ok((tw as u32, th as u32))
    }

    /// The pixel values: transparency composited over white, resized to [`Self::target`]
    /// (bilinear for a square, bicubic otherwise, the filter widened when shrinking as
    /// PIL's resizes do), each channel `(v / 255 - mean) / std`.
    pub fn pixels(&self, img: &DynamicImage) -> Result<Pixels> {
        let rgb = over_white(img);
        let (w, h) = self.target(rgb.width(), rgb.height())?;
        let filter = match self.size {
            Size::Square(_) => image::imageops::FilterType::Triangle,
            Size::Fit { .. } => image::imageops::FilterType::CatmullRom,
        };
        let resized = if rgb.dimensions() == (w, h) {
            rgb
        } else {
            image::imageops::resize(&rgb, w, h, filter)
        };
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        for (i, p) in resized.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Pixels {
            data,
            width: w as usize,
            height: h as usize,
        })
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
        size: Size::Square(4),
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
        let px = HALF.pixels(&decode(&png).unwrap()).unwrap().data;
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
            let px = HALF.pixels(&decoded).unwrap().data;
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
    fn qwen_sizes_follow_smart_resize() {
        // Worked through transformers' smart_resize (factor 32, 256x256..1024x1024 pixels).
        let p = Preprocess {
            size: Size::Fit {
                factor: 32,
                min_pixels: 256 * 256,
                max_pixels: 1024 * 1024,
            },
            ..HALF
        };
        for ((w, h), want) in [
            ((448, 448), (448, 448)),
            ((640, 480), (640, 480)),
            // 300/32 = 9.375 -> 9; 200/32 = 6.25 -> 6: 288x192, under the minimum area, so
            // scaled up by sqrt(65536 / 60000) and rounded up: 320x224.
            ((300, 200), (320, 224)),
            // 4000x3000 is over the maximum: beta = sqrt(12e6 / 1048576) = 3.383, floors
            // of 36.95 and 27.71 patches.
            ((4000, 3000), (1152, 864)),
            // 1.5 patches round (half to even) to 2, 62.5 to 62.
            ((48, 2000), (64, 1984)),
        ] {
            assert_eq!(p.target(w, h).unwrap(), want, "{w}x{h}");
        }
        assert!(matches!(p.target(10, 2001), Err(Error::Image(_))));
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            300,
            200,
            image::Rgb([10, 20, 30]),
        ));
        let px = p.pixels(&img).unwrap();
        assert_eq!((px.width, px.height), (320, 224));
        assert_eq!(px.data.len(), 3 * 320 * 224);
    }

    #[test]
    fn transparency_is_white_and_bad_data_is_an_error() {
        let mut img = RgbaImage::from_pixel(2, 2, Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 1, Rgba([0, 0, 0, 255]));
        let png = encode(&DynamicImage::ImageRgba8(img), ImageFormat::Png);
        let p = Preprocess {
            size: Size::Square(2),
            ..HALF
        };
        let px = p.pixels(&decode(&png).unwrap()).unwrap().data;
        assert_eq!(&px[..4], &[1.0, 1.0, 1.0, -1.0]);
        for bad in [&b"not an image"[..], &png[..png.len() / 2], b""] {
            assert!(matches!(decode(bad), Err(Error::Image(_))));
        }
    }
}
